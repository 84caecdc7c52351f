from respiscan.cli import main

main()
